"""An example third-party kvloom plugin.

It registers two components through the ``kvloom`` entry point ``kvloom_example``
(see :mod:`kvloom_plugin_example.plugin`):

* ``fast_nucleus``: a sampler that does top-k / top-p / min-p filtering over the
  few most likely tokens instead of sorting the whole vocabulary, with an exact
  fallback for the rows that need more;
* ``sdpa_batched``: an attention backend that runs the whole batch through one
  ``scaled_dot_product_attention`` call, on any torch device.
"""
