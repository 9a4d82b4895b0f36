"""GRL: the domain loss trains the classifier to separate domains and, through the reversal,
pushes the encoder the other way (signs and magnitudes checked on one SGD step)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import CLASS_NAMES, tiny_batch, tiny_segmentor
from uda_tf import losses
from uda_tf.methods import GRL
from uda_tf.methods.grl import OUTPUT_KEY, feature_keys
from uda_tf.models.discriminators import domain_classifier, output_domain_classifier
from uda_tf.methods.schedules import LambdaSchedule

LR, LAM = 0.1, 0.5


def _classifier(seg, keys):
    keras.utils.set_random_seed(1)
    return domain_classifier([seg.output[k].shape[1:] for k in keys], hidden=(8, 8))


def _grl(domain_loss_weight, keys=("features",)):
    seg = tiny_segmentor(seed=0)
    model = GRL(seg, CLASS_NAMES, domain_classifier=_classifier(seg, keys),
                lambda_schedule=LambdaSchedule("constant", LAM, 10),
                domain_loss_weight=domain_loss_weight, feature_keys=keys)
    model.compile(seg=keras.optimizers.SGD(LR), disc=keras.optimizers.SGD(LR))
    model.build_optimizers()
    return model


def _domain_loss(seg, clf, x_s, x_t, keys=("features",)):
    out = seg(tf.concat([x_s, x_t], 0), training=True)
    feats = [out[k] for k in keys]
    is_source = tf.concat([tf.ones([len(x_s)]), tf.zeros([len(x_t)])], 0)
    return tf.reduce_mean(losses.binary_cross_entropy(is_source, clf(feats)))


def _step(model, x_s, y_s, x_t):
    ds = tf.data.Dataset.from_tensors(((x_s, y_s), x_t))
    model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)


@pytest.mark.parametrize("which", ["bottleneck", "encoder"])
def test_grl_classifier_descends_and_encoder_ascends_on_domain_loss(which):
    x_s, y_s, x_t = tiny_batch()
    seg0 = tiny_segmentor(seed=0)
    keys = feature_keys(seg0, which)
    assert keys == (["features"] if which == "bottleneck"
                    else ["encoder0", "encoder1", "features"])
    adapted, plain = _grl(1.0, keys), _grl(0.0, keys)
    clf0 = adapted.domain_classifier
    clf_before = [v.numpy() for v in clf0.trainable_variables]
    enc_vars = [v for v in seg0.trainable_variables
                if v.path.split("/")[0].startswith(("enc", "bottleneck"))]
    dec_vars = [v for v in seg0.trainable_variables if v.path.split("/")[0].startswith("dec")]
    with tf.GradientTape(persistent=True) as tape:
        dom = _domain_loss(seg0, clf0, x_s, x_t, keys)
    g_enc = tape.gradient(dom, enc_vars)
    g_clf = tape.gradient(dom, clf0.trainable_variables)

    _step(adapted, x_s, y_s, x_t)
    _step(plain, x_s, y_s, x_t)

    # Encoder: the domain term moves it by +lr*lambda*grad (gradient ascent on domain loss);
    # the decoder does not see the domain loss at all.
    by_path = lambda m: {v.path: v.numpy() for v in m.segmentor.trainable_variables}  # noqa
    a, p = by_path(adapted), by_path(plain)
    for v, g in zip(enc_vars, g_enc):
        np.testing.assert_allclose(a[v.path] - p[v.path], LR * LAM * g.numpy(),
                                   atol=1e-6, rtol=1e-3, err_msg=v.path)
    for v in dec_vars:
        np.testing.assert_allclose(a[v.path], p[v.path], atol=1e-7, err_msg=v.path)
    assert sum(float(tf.reduce_sum(g * g)) for g in g_enc) > 0

    # Classifier: plain gradient descent on the domain loss (no reversal on its side).
    clf_after = [v.numpy() for v in adapted.domain_classifier.trainable_variables]
    for before, after, g in zip(clf_before, clf_after, g_clf):
        np.testing.assert_allclose(after - before, -LR * g.numpy(), atol=1e-6, rtol=1e-3)

    # Signs as a user sees them: the new encoder's features are harder for the old classifier
    # to separate than those of the encoder trained without the domain term.
    old_clf = _classifier(seg0, keys)
    old_clf.set_weights(clf_before)
    assert float(_domain_loss(adapted.segmentor, old_clf, x_s, x_t, keys)) > \
        float(_domain_loss(plain.segmentor, old_clf, x_s, x_t, keys))


def test_grl_logs_lambda_from_schedule():
    x_s, y_s, x_t = tiny_batch()
    model = _grl(1.0)
    ds = tf.data.Dataset.from_tensors(((x_s, y_s), x_t))
    logs = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0).history
    assert abs(logs["lambda"][-1] - LAM) < 1e-6
    assert 0.0 <= logs["domain_acc"][-1] <= 1.0


def test_output_space_grl_reverses_the_classifier_gradient_into_the_whole_segmentor():
    """--grl_features=output (Javanmardi & Tasdizen 2018): softmax maps -> GRL -> CNN. The
    domain term moves every segmentor weight, decoder included, by +lr*lambda*grad."""
    x_s, y_s, x_t = tiny_batch()
    seg0 = tiny_segmentor(seed=0)
    keys = feature_keys(seg0, "output")
    assert keys == [OUTPUT_KEY]

    def make(weight):
        keras.utils.set_random_seed(1)
        clf = output_domain_classifier(seg0.output["logits"].shape[1:], filters=(4, 8),
                                       hidden=(8,))
        model = GRL(tiny_segmentor(seed=0), CLASS_NAMES, domain_classifier=clf,
                    lambda_schedule=LambdaSchedule("constant", LAM, 10),
                    domain_loss_weight=weight, feature_keys=keys)
        model.compile(seg=keras.optimizers.SGD(LR), disc=keras.optimizers.SGD(LR))
        model.build_optimizers()
        return model

    adapted, plain = make(1.0), make(0.0)
    clf = adapted.domain_classifier
    clf_before = [v.numpy() for v in clf.trainable_variables]
    is_source = tf.concat([tf.ones([len(x_s)]), tf.zeros([len(x_t)])], 0)
    with tf.GradientTape(persistent=True) as tape:
        logits = seg0(tf.concat([x_s, x_t], 0), training=True)["logits"]
        probs = tf.nn.softmax(logits, axis=-1)
        dom = tf.reduce_mean(losses.binary_cross_entropy(is_source, clf(probs)))
    g_seg = tape.gradient(dom, seg0.trainable_variables)
    g_clf = tape.gradient(dom, clf.trainable_variables)
    _step(adapted, x_s, y_s, x_t)
    _step(plain, x_s, y_s, x_t)

    for v, a, p, g in zip(seg0.trainable_variables, adapted.segmentor.trainable_variables,
                          plain.segmentor.trainable_variables, g_seg):
        np.testing.assert_allclose(a.numpy() - p.numpy(), LR * LAM * g.numpy(), atol=1e-6,
                                   rtol=1e-3, err_msg=v.path)
    decoder = [g for v, g in zip(seg0.trainable_variables, g_seg)
               if v.path.startswith(("dec", "logits"))]
    assert sum(float(tf.reduce_sum(g * g)) for g in decoder) > 0  # reaches past the bottleneck
    for before, after, g in zip(clf_before, clf.trainable_variables, g_clf):
        np.testing.assert_allclose(after.numpy() - before, -LR * g.numpy(), atol=1e-6,
                                   rtol=1e-3)
