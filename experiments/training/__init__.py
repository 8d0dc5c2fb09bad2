"""The training core: the state and pure steps, the paper's recipe, and the loop.

`loop.train_and_evaluate(config, workdir)` is the entry point; `experiments.runtime`
is the shell the command lines put around it.
"""
