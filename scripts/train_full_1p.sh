#!/usr/bin/env bash
# Full accuracy run on 1 device(s) with the reference recipe (configs/mobilenetv3_large_1p.yaml).
#   bash scripts/train_full_1p.sh --data_path=/data/ImageNet [extra train.py flags]
source "$(dirname "$0")/launch_common.sh"
launch 1 configs/mobilenetv3_large_1p.yaml full_1p "$@"
