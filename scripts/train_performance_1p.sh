#!/usr/bin/env bash
# Performance run on 1 device(s): the reference recipe for 1 epoch of at most 500 steps, then img/s.
#   bash scripts/train_performance_1p.sh --data_path=/data/ImageNet [extra train.py flags]
source "$(dirname "$0")/launch_common.sh"
launch 1 configs/mobilenetv3_large_1p.yaml performance_1p --epochs 1 --max_steps 500 "$@"
