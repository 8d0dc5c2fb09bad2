"""The operational shell around the training core: flags and exit statuses, the
workdir and its lock, stop signals, several processes, log hygiene, user errors."""
