"""Pure forward/backward pairs.

Each ``*_forward`` returns ``(output, cache)`` with the smallest cache its
``*_backward`` needs; each ``*_backward(cache, grad_output)`` returns the
gradients of the forward's inputs, in order.  Everything is written against the
array-API namespace of the inputs.
"""
