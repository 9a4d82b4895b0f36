"""`python -m uda_tf.phantom --output_dir=DIR`: write the built-in demo dataset.

Everything lives in uda_tf.data.phantom; this module only gives it a short entry point.
"""
from uda_tf.data import phantom

if __name__ == "__main__":
    phantom.run()
