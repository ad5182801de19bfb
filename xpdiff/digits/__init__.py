"""The digits application, built on the library: the embedded MNIST digits and IDX files
(``data``), the run configuration and trainer (``training``), the digit classifier that
judges samples (``classifier``) and its report (``evaluation``), grids, GIFs and figures
(``images``) and the command line (``cli``).  The library core (backend, functional, nn,
models, schedulers, pipelines, optim, io, configuration) imports nothing from here."""
