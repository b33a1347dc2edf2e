# The GPU study's model and data flags, sourced by run_study_gpu.sh and run_ablate_gpu.sh so that the
# ablations train exactly the study's BSA model: the model of docs/results.md (width 128, 6 layers,
# 4 heads of dimension 32, the paper's BSA sizes) on the generated car data.
STUDY_NET="--hidden 128 --layers 6 --heads 4 --mlp-ratio 4 --batch-size 8 --ball-size 256 --cmp-block 8 --slc-block 8
           --topk 16 --group-size 8 --knn 16 --lr 1e-3"
study_car_data() { echo "--dataset car --data-size full --num-train ${NUM_TRAIN:-512} --num-test ${NUM_TEST:-128} --root ${ROOT_DATA:-data}"; }
study_multibody_data() { echo "--dataset multibody --data-size full --num-train ${NUM_TRAIN:-512} --num-test ${NUM_TEST:-128} --root ${ROOT_DATA:-data}"; }
