"""``distgrow train``'s exit statuses: one definition for the trainer, the launch controller,
the report and the command line (the file exit 75 leaves is :class:`distgrow.rundir.ResizeRequest`).

This module imports nothing, so that the controller and the report stay free of torch.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # config, data, run-directory or checkpoint problem: nothing trained
# (also a full or read-only disk: the worker's line starts "cannot write the "; never retried)
EXIT_NONFINITE = 65  # sysexits EX_DATAERR: the numbers went bad, not the program
EXIT_NEED_WORKERS = 75  # sysexits EX_TEMPFAIL: retry with more workers
