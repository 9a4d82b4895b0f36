"""One worker of tests/cli/test_multiworker_cli.py (not a test module itself): train.py's
command line, as a user runs it, plus a record of what the test compares across workers.

    TF_CONFIG=... UDA_TEST_WORKER_OUT=<file.npz> python tests/cli/train_worker.py <train.py flags>

Runs `uda_tf.cli.train.run()` (the flags, checks and main of train.py) with its
`fit_and_keep_best` wrapped so that the model's trainable variables before and after fit, and
fit's per-epoch logs, are saved to $UDA_TEST_WORKER_OUT (variables `before<i>`, `after<i>`;
logs as JSON in `history`). Nothing else of the run changes.
"""
import json
import os

import numpy as np


def main():
    from uda_tf.cli import train
    fit = train.fit_and_keep_best

    def recorded(cfg, model, **kwargs):
        before = [v.numpy() for v in model.trainable_variables]
        out = fit(cfg, model, **kwargs)
        after = [v.numpy() for v in model.trainable_variables]
        history = {k: [float(x) for x in v] for k, v in model.history.history.items()}
        np.savez(os.environ["UDA_TEST_WORKER_OUT"],
                 **{f"before{i}": v for i, v in enumerate(before)},
                 **{f"after{i}": v for i, v in enumerate(after)},
                 history=np.array(json.dumps(history)))
        return out

    train.fit_and_keep_best = recorded
    train.run()


if __name__ == "__main__":
    main()
