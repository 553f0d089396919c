"""The exit codes of ``tread-scale train`` (and ``launch.py``), which scripts and Slurm recipes act on.

======  ==========================================================================================
code    meaning
======  ==========================================================================================
0       the run completed ``train.max_duration``
2       a clear error (bad input, a data stall, a peer that failed, a timed-out barrier): one line
        ``tread-scale train: error: …`` says what and where; rerunning without a fix fails again
        unless the cause was transient (a hung file system, a lost node)
75      stopped early after saving a checkpoint (SIGTERM/SIGUSR1, the preemption flag file): rerun
        the same command to resume; Slurm recipes requeue the job (``EX_TEMPFAIL`` of sysexits.h)
128+N   ended by signal N without a checkpoint (e.g. 143: SIGTERM and no batch end within
        ``train.preemption_grace``, or a second SIGTERM); the last saved checkpoint still resumes
1       anything else (an unexpected exception: its traceback is in the log)
======  ==========================================================================================
"""

EXIT_OK = 0
EXIT_ERROR = 2
#: Stopped before ``max_duration`` with a checkpoint saved: rerun (requeue) to resume.
EXIT_STOPPED = 75

__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_STOPPED"]
