"""Multi-process runs under torchrun: the process group (``env``), collectives that name the
failing rank (``collectives``), who trains what (``assign``), the run layout on disk
(``layout``), the parallel plans a trainer is given (``plans``), the activation exchange of
online runs (``exchange``) and the entry point per mode (``modes``)."""
