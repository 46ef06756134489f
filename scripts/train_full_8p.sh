#!/usr/bin/env bash
# Full accuracy run on 8 device(s) with the reference recipe (configs/mobilenetv3_large_8p.yaml).
#   bash scripts/train_full_8p.sh --data_path=/data/ImageNet [extra train.py flags]
source "$(dirname "$0")/launch_common.sh"
launch 8 configs/mobilenetv3_large_8p.yaml full_8p "$@"
