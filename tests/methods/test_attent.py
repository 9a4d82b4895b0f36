"""AttENT (uda_tf/methods/attent.py): translators, fake pool, which optimizer moves which
network, phases, replicas, and the exported `translate` signature."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, SHAPE, tiny_batch, tiny_segmentor
from uda_tf.methods.attent import AttENT, FakePool, phase_at
from uda_tf.models.discriminators import entropy_discriminator
from uda_tf.models.translators import patch_discriminator, translator

SETTINGS = {"filters": 2, "depth": 1, "residual_blocks": 0, "attention": True}
NETWORKS = ("seg", "ent_disc", "g_st", "g_ts", "d_s", "d_t")


def tiny_attent(schedule="joint", translation_epochs=0, pool=4, seed=0, lr=0.01, eager=True,
                identity_weight=5.0):
    """Eager by default: a step or two of this six-network graph run faster than it traces."""
    seg = tiny_segmentor(seed=seed)
    keras.utils.set_random_seed(seed + 1)
    translators = {n: translator(SHAPE, name=n, **SETTINGS) for n in ("g_st", "g_ts")}
    discs = {n: patch_discriminator(SHAPE, filters=2, layers=1, name=n) for n in ("d_s", "d_t")}
    ent = entropy_discriminator(SHAPE[:-1] + (1,), filters=(4,) * 5, patch=True)
    model = AttENT(seg, CLASS_NAMES, translators=translators, image_discs=discs,
                   entropy_disc=ent, schedule=schedule, translation_epochs=translation_epochs,
                   fake_pool_size=pool, translator_settings=SETTINGS, seed=seed,
                   minent_weight=0.1, entropy_weight=0.5, identity_weight=identity_weight)
    model.compile(**{n: keras.optimizers.Adam(lr) for n in NETWORKS})
    model.run_eagerly = eager
    return model


def _snapshot(model):
    return {n: [v.numpy().copy() for v in t.weights]
            for n, t in model.optimizer_targets().items()}


def _changed(before, after):
    return {n for n in before
            if any(not np.array_equal(a, b) for a, b in zip(before[n], after[n]))}


def _dataset(n=4):
    x_s, y_s, x_t = tiny_batch(n=n)
    # Translators start as the identity: give the "target" a different contrast, so that the
    # image discriminators and the translators have something to learn at once.
    return tf.data.Dataset.from_tensors(((x_s, y_s), 1.0 - x_t)).repeat()


@pytest.mark.parametrize("attention", [True, False])
def test_new_translators_reproduce_their_input_through_the_cycle(attention):
    keras.utils.set_random_seed(0)
    g_st = translator(SHAPE, filters=2, depth=2, attention=attention, name="g_st")
    g_ts = translator(SHAPE, filters=2, depth=2, attention=attention, name="g_ts")
    x = np.random.default_rng(0).normal(size=(3, *SHAPE)).astype(np.float32)
    np.testing.assert_array_equal(g_st(x).numpy(), x)
    np.testing.assert_array_equal(g_ts(g_st(x)).numpy(), x)
    # and the gates are there (or not): the skip paths pass through them
    names = [layer.name for layer in g_st.layers]
    assert any("_att0_gated" in n for n in names) == attention
    # once the residual head moves, the translator is no longer the identity
    head = g_st.get_layer("g_st_residual")
    head.kernel.assign(tf.fill(head.kernel.shape, 0.1))
    assert np.abs(g_st(x).numpy() - x).max() > 1e-3


def test_each_optimizer_changes_only_its_own_network():
    model = tiny_attent()
    model.make_train_function()
    iterator = iter(_dataset())
    model.train_function(iterator)  # a first step: every network has gradients from now on
    for name, opt in model.optimizers.items():
        rates = {n: float(o.learning_rate.numpy()) for n, o in model.optimizers.items()}
        for other, o in model.optimizers.items():
            o.learning_rate = rates[other] if other == name else 0.0
        before = _snapshot(model)
        model.train_function(iterator)
        assert _changed(before, _snapshot(model)) == {name}, name
        for other, o in model.optimizers.items():
            o.learning_rate = rates[other]
    # each optimizer holds slots for exactly its network's variables, and no two share one
    owners = {}
    for name, target in model.optimizer_targets().items():
        for v in target.trainable_variables:
            assert id(v) not in owners, (name, owners.get(id(v)))
            owners[id(v)] = name
    assert len(owners) == len(model.trainable_variables)


def test_staged_schedule_translates_first_then_segments_with_frozen_translators():
    assert [phase_at(e, "staged", 2) for e in range(4)] == ["translate"] * 2 + ["segment"] * 2
    assert [phase_at(e, "joint", 1) for e in range(3)] == ["translate", "joint", "joint"]
    # (traced, as train.py runs it, the switch is exercised by the two-worker AttENT run in
    # tests/cli/test_multiworker_cli.py)
    model = tiny_attent(schedule="staged", translation_epochs=1, identity_weight=0.0)
    changed = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.before = _snapshot(model)

        def on_epoch_end(self, epoch, logs=None):
            changed.append(_changed(self.before, _snapshot(model)))

    model.fit(_dataset(), epochs=2, steps_per_epoch=2, verbose=0,
              callbacks=[*model.training_callbacks(), Record()])
    assert changed == [{"g_st", "g_ts", "d_s", "d_t"}, {"seg", "ent_disc"}]


def test_fake_pool_fills_then_returns_past_fakes_half_of_the_time():
    pool = FakePool(8, (2,))
    seen = []
    returned_past = 0
    total = 0
    for step in range(200):
        fakes = np.full((4, 2), step, np.float32) + np.arange(4, dtype=np.float32)[:, None] / 10
        out = pool.query(fakes, tf.constant([5, step], tf.int64)).numpy()
        if step < 2:  # filling: the fakes come back and are stored
            np.testing.assert_array_equal(out, fakes)
        else:
            past = out[:, 0] < step  # an earlier step's fake
            returned_past += int(past.sum())
            total += len(out)
            # what comes back is the new fake or one seen before, never anything else
            for row, is_past in zip(out, past):
                assert (not is_past and row[0] >= step) or any(
                    np.array_equal(row, s) for s in seen)
        seen.extend(fakes)
    assert int(pool.count.numpy()) == 8
    share = returned_past / total
    assert 0.44 < share < 0.56, share  # 784 draws of p = 1/2: std 0.018
    assert np.array_equal(FakePool(0, (2,)).query(np.ones((3, 2)), tf.constant([0, 0])),
                          np.ones((3, 2)))


def _weights_after_one_step(strategy):
    with strategy.scope():
        model = tiny_attent(lr=0.05)
    before = _snapshot(model)
    logs = model.fit(_dataset(), epochs=1, steps_per_epoch=1, verbose=0).history
    return before, _snapshot(model), logs


@pytest.mark.slow
def test_one_joint_step_on_two_replicas_matches_one_device(one_device, two_replicas):
    b1, w1, logs1 = _weights_after_one_step(one_device)
    b2, w2, logs2 = _weights_after_one_step(two_replicas)
    for name in NETWORKS:
        for x, y in zip(b1[name], b2[name]):
            np.testing.assert_array_equal(x, y)  # same start
        for x, y in zip(w1[name], w2[name]):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name)
    # every network took its step (a new translator's inner layers get their first gradient
    # once its zero-initialised head has moved)
    assert _changed(b1, w1) == set(NETWORKS)
    for key in ("seg_loss", "g_loss", "cycle_loss", "d_img_loss", "d_ent_loss"):
        np.testing.assert_allclose(logs1[key], logs2[key], rtol=1e-4)


def test_export_has_a_translate_signature_with_both_translators(tmp_path):
    from uda_tf.serving.export import TRANSLATE, export_segmentor, load_serving_fn
    model = tiny_attent()
    rng = np.random.default_rng(2)
    for net in (model.g_st, model.g_ts):  # away from the identity, each its own way
        head = net.get_layer(f"{net.name}_residual")
        head.kernel.assign(rng.normal(0, 0.1, head.kernel.shape).astype(np.float32))
    rebuilt = {}
    for name, trained in model.exported_networks().items():
        rebuilt[name] = translator(SHAPE, name=trained.name, **SETTINGS)
        rebuilt[name].set_weights(trained.get_weights())
    path = export_segmentor(model.segmentor, str(tmp_path), "m", translators=rebuilt,
                            warmup_batch_sizes=(1,))
    x = np.random.default_rng(1).random((2, *SHAPE), dtype=np.float32)
    translate = load_serving_fn(path, TRANSLATE)(image=tf.constant(x))
    np.testing.assert_allclose(translate["to_target"].numpy(), model.g_st(x).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(translate["to_source"].numpy(), model.g_ts(x).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert np.abs(translate["to_target"].numpy() - x).max() > 1e-4  # not the identity
    probs = load_serving_fn(path)(image=tf.constant(x))["probabilities"].numpy()
    expected = tf.nn.softmax(model.segmentor(x)["logits"]).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_a_backup_restores_every_network_optimizer_and_pool(tmp_path):
    from uda_tf.training import resume
    model = tiny_attent()
    model.fit(_dataset(), epochs=1, steps_per_epoch=2, verbose=0)  # 8 fakes: the pool swaps
    backup = resume.TrainingBackup(str(tmp_path), steps_per_epoch=2)
    backup.set_model(model)
    backup.save()
    fresh = tiny_attent()  # the same method seed (the pool's draws), another state:
    fresh.fit(_dataset(), epochs=1, steps_per_epoch=1, verbose=0)
    resume.TrainingBackup(str(tmp_path), steps_per_epoch=2).restore(fresh)
    groups, restored = resume.state_groups(model), resume.state_groups(fresh)
    assert sorted(groups) == sorted(restored)
    assert {"optimizer/seg_optimizer", "optimizer/g_st_optimizer",
            "optimizer/ent_disc_optimizer"} <= set(groups)
    for name in (g for g in groups if g != "metrics"):  # metrics restart each epoch
        for a, b in zip(groups[name], restored[name]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert int(fresh.pool_t.count.numpy()) == 4
    # and the next step is the same step: same fakes drawn from the same pool
    for m in (model, fresh):
        m.fit(_dataset(), epochs=1, steps_per_epoch=1, verbose=0)
    for a, b in zip(model.trainable_variables, fresh.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


class _Tracker:
    def __init__(self):
        self.artifacts = []

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((path, artifact_path))


def test_translation_fidelity_logs_scores_and_draws_the_epochs_panels(tmp_path):
    """The callback scores G_st against the true paired rendering each epoch and offers its
    panels (source, translation, reconstruction, true rendering, entropy), which train.py's
    EpochFigures draws under plots/translation/ and logs to MLflow."""
    from uda_tf.data.paired import PairedSlices
    from uda_tf.evaluation.figures import image_grid
    from uda_tf.methods.attent import TranslationFidelity
    from uda_tf.training.tracking import EpochFigures
    x_s, y_s, _ = tiny_batch(n=6)
    pairs = PairedSlices(source=x_s, reference=1.0 - x_s, labels=y_s, cases=("s0",))
    fidelity = TranslationFidelity(pairs, {0: "background", 1: "a", 2: "b"}, batch_size=4)
    model = tiny_attent()
    fidelity.set_model(model)
    assert fidelity.epoch_figures() is None
    logs = {"seg_loss": 1.0}
    drawn = []  # the panels are made when asked (on the chief), not at every epoch's end
    panels = fidelity.image_panels
    fidelity.image_panels = lambda m: drawn.append(m) or panels(m)
    fidelity.on_epoch_end(0, logs)
    assert drawn == []
    # new translators are the identity: scores equal the untranslated ones
    assert logs["translation/mae"] == pytest.approx(logs["translation/untranslated_mae"])
    assert logs["translation/mae"] == pytest.approx(np.abs(x_s - (1.0 - x_s)).mean())
    name, title, columns, maps = fidelity.epoch_figures()
    assert drawn == [model]
    assert name == "translation/epoch_000" and "epoch 1" in title
    rows = list(fidelity.panel_slices)
    assert rows == [1, 2, 4]  # inside the held slices, ends left out
    np.testing.assert_array_equal(columns["source"], x_s[rows])
    np.testing.assert_array_equal(columns["true target rendering"], 1.0 - x_s[rows])
    np.testing.assert_allclose(columns["translated"], x_s[rows], atol=1e-6)
    np.testing.assert_allclose(columns["reconstructed"], x_s[rows], atol=1e-6)
    entropy = columns["entropy on the rendering"]
    assert entropy.shape == (3, *SHAPE) and 0 <= entropy.min() and entropy.max() <= 1
    assert maps == ("entropy on the rendering",)
    tracker = _Tracker()
    drawer = EpochFigures([fidelity], str(tmp_path / "plots"), tracker, image_grid)
    drawer.on_epoch_end(0)
    png = tmp_path / "plots" / "translation" / "epoch_000.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tracker.artifacts == [(str(png), "plots/translation")]


def test_the_checkpoint_keeps_the_translators_of_the_kept_epoch(tmp_path):
    from uda_tf.training.callbacks import BestSegmentorCheckpoint, companion_path
    model = tiny_attent()
    path = str(tmp_path / "best.weights.h5")
    checkpoint = BestSegmentorCheckpoint(path)
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0, {"val_dice": 0.5})
    kept = model.g_st.get_weights()
    head = model.g_st.get_layer("g_st_residual")
    head.kernel.assign(tf.fill(head.kernel.shape, 0.3))  # training goes on ...
    checkpoint.on_epoch_end(1, {"val_dice": 0.4})        # ... but this epoch is not kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.to_source.weights.h5", "best.to_target.weights.h5", "best.weights.h5"]
    again = translator(SHAPE, name="g_st", **SETTINGS)
    again.load_weights(companion_path(path, "to_target"))
    for a, b in zip(again.get_weights(), kept):
        np.testing.assert_array_equal(a, b)


class _RunConfig:
    method = "attent"

    def flag_values(self):
        return {"translator_filters": 2, "translator_depth": 1, "attention_gates": False}


def test_uda_export_rebuilds_the_translators_from_the_run_config(tmp_path):
    """serving.export.exported_networks_of: what train.py and uda-export put in the
    `translate` signature: the run's translators rebuilt from its config and loaded from the
    files beside the checkpoint; a missing file is named."""
    from uda_tf.serving.export import exported_networks_of
    from uda_tf.training.callbacks import companion_path
    weights = str(tmp_path / "best.weights.h5")
    with pytest.raises(FileNotFoundError, match=r"--checkpoint=.*best\.to_target\.weights\.h5 "
                                                "is missing: --method=attent"):
        exported_networks_of(_RunConfig(), weights, SHAPE, "--checkpoint")
    config = AttENT.configure(_RunConfig().flag_values())
    saved = {}
    for name, build in AttENT.export_builders(config, SHAPE).items():
        net = build()
        head = net.get_layer(f"{net.name}_residual")
        head.kernel.assign(tf.fill(head.kernel.shape, 0.01 * (len(saved) + 1)))
        net.save_weights(companion_path(weights, name))
        saved[name] = net
    rebuilt = exported_networks_of(_RunConfig(), weights, SHAPE, "--checkpoint")
    assert sorted(rebuilt) == ["to_source", "to_target"]
    x = np.random.default_rng(0).random((2, *SHAPE), dtype=np.float32)
    for name, net in rebuilt.items():
        assert not any("_att" in layer.name for layer in net.layers)  # --attention_gates=false
        np.testing.assert_array_equal(net(x).numpy(), saved[name](x).numpy())

    class Other(_RunConfig):
        method = "source_only"
    assert exported_networks_of(Other(), weights, SHAPE, "--checkpoint") == {}
