"""How a student trains, in one room.

- `core`: the one epoch loop (`fit`) and its worlds (`InMemory`: one process, or rank r of N on
  the same global batches); targets, held-out split, prediction. No Ray.
- `recipe`: read inputs → fit → evaluate → result, and the typed payloads that cross Ray
  (`StudentJob`, `TestSplit`). No Ray.
- `ray_train`: the Ray Train world (`TorchTrainer`, DDP; a Ray Data stream or in-memory batches).

Where the work runs (a Ray task, a Tune trial, Ray Train workers) is decided by the stage
(`students`), the Tune trial (`trial`) and the task bodies (`workers`); each calls the recipe.
"""
