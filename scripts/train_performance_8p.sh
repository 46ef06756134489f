#!/usr/bin/env bash
# Performance run on 8 device(s): the reference recipe for 1 epoch of at most 500 steps, then img/s.
#   bash scripts/train_performance_8p.sh --data_path=/data/ImageNet [extra train.py flags]
source "$(dirname "$0")/launch_common.sh"
launch 8 configs/mobilenetv3_large_8p.yaml performance_8p --epochs 1 --max_steps 500 "$@"
