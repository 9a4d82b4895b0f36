"""One worker of tests/methods/test_multiworker.py (not a test module itself).

    TF_CONFIG=... python multiworker_worker.py <prepared data dir> <output dir> <method>

Trains <method> (grl: segmentor and domain classifier, two optimizers; adversarial: segmentor
and feature and entropy discriminators, three optimizers, alternating updates) for a few steps
with validation under MultiWorkerMirroredStrategy from TF_CONFIG, through the same pipeline, method and
checkpoint callback as train.py, then saves its weights before and after, its logs, and where
it wrote its checkpoint, to <output dir>/worker<i>.npz and .json.
"""
import json
import os
import sys
from types import SimpleNamespace


def main(data_dir, out_dir, method):
    import time
    t0 = time.time()
    mark = lambda what: print(f"{time.time() - t0:6.1f}s {what}", file=sys.stderr, flush=True)  # noqa
    from uda_tf.training import devices, multiworker
    strategy = devices.make_strategy(cluster="tf_config")  # first: before TF touches devices
    mark("strategy")
    import keras
    import numpy as np

    from uda_tf.data import pipeline
    from uda_tf.data.manifest import load_manifest
    from uda_tf.methods import get_method
    from uda_tf.models import segmentor_from_flags
    from uda_tf.training.callbacks import BestSegmentorCheckpoint

    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    manifest = load_manifest(data_dir)
    cfg = SimpleNamespace(base_filters=2, norm="instance", dice_weight=1.0, class_weights=None,
                          minent_weight=0.0,
                          grl_features="bottleneck", lambda_schedule="constant", grl_lambda=1.0,
                          domain_loss_weight=1.0, epochs=1, steps_per_epoch=3,
                          learning_rate=1e-2, disc_learning_rate=1e-2, jit_compile=False,
                          adv_discriminators="both", patch_discriminators=False, adv_loss="bce",
                          adv_feature_weight=0.1, adv_entropy_weight=0.1, adv_both_domains=True,
                          disc_steps=1, gp_weight=10.0, seed=0, lr_schedule="constant",
                          disc_lr_schedule="same", lr_decay=0.75, warmup_steps=0)
    names = [manifest["label_names"][str(i)] for i in range(manifest["num_classes"])]
    train_ds = pipeline.train_dataset(
        data_dir, manifest, source="dom_a", target="dom_b", global_batch_size=4,
        shuffle_buffer=16, seed=0, augment_data=True,
        num_workers=multiworker.num_workers(strategy))
    val_ds = pipeline.eval_dataset(data_dir, manifest, "dom_a", "val", batch_size=4).repeat()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        method_cls = get_method(method)
        model = method_cls.build(segmentor_from_flags(vars(cfg), manifest), names,
                                 method_cls.configure(vars(cfg)), cfg)
    mark("built")
    before = [v.numpy() for v in model.trainable_variables]
    run_dir = os.path.join(out_dir, "run")
    write_dir = multiworker.worker_dir(run_dir, strategy)
    ckpt = os.path.join(write_dir, "checkpoints", "best.weights.h5")
    history = model.fit(train_ds, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch,
                        validation_data=val_ds, validation_steps=1, verbose=0,
                        callbacks=[BestSegmentorCheckpoint(ckpt)]).history
    wrote = os.path.isfile(ckpt)
    mark("fit")
    multiworker.cleanup_worker_dir(write_dir, strategy)
    after = [v.numpy() for v in model.trainable_variables]
    np.savez(os.path.join(out_dir, f"worker{index}.npz"),
             **{f"before{i}": v for i, v in enumerate(before)},
             **{f"after{i}": v for i, v in enumerate(after)})
    info = {"chief": multiworker.is_chief(strategy), "workers": multiworker.num_workers(strategy),
            "replicas": strategy.num_replicas_in_sync, "wrote_checkpoint": wrote,
            "write_dir": write_dir, "write_dir_left": os.path.exists(write_dir),
            "history": {k: [float(x) for x in v] for k, v in history.items()}}
    with open(os.path.join(out_dir, f"worker{index}.json"), "w") as f:
        json.dump(info, f)
    mark("saved")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
