"""The training loop and what it drives, one job a module (snapjax/training.py is the entry point above them).

  loop.py        the one loop of every run: dispatch, non-finite check, progress, save, snapshot, next model, stop.
  one_member.py  the Trainee of a one-member run: its state, batches, update, snapshots, SingleCycle hand-over.
  k_members.py   the Trainee of K members (or SingleCycle's M models) side by side on the member mesh axis.
  setup.py       Settings (the config resolved once into typed values) and Run (data, plan, optimiser, workdir).
  preemption.py  a preemption notice (SIGTERM) turned into a stop every host takes after the same dispatch.
  base.py        what they share: Hooks, TrainResult, TrainingDiverged and the Trainee interface.

Imports go down this list's reverse: base <- setup, preemption <- one_member, k_members <- loop; the loop imports
the Trainee interface (base.py), never a trainee, and training.py picks the trainee.
"""
