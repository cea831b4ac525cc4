"""Issues 9 and 23's study (scripts/study.py): every Table 1 arm and the methods that followed (FGE, SWA, SWAG, a
distilled student, a deep ensemble) on real Fashion-MNIST, several seeds, one budget.

One job per module, each importing only from the ones above it:

    serving  one network's serving cost (ms per example, weights MB) measured on a finished run: the last step
    plan     the arms, seeds and budget; each training run and evaluation, its command, what it needs, its status
    stats    paired per-seed statistics, the verdicts and their sentences (pure functions of a results dict)
    records  each finished step's outputs copied where the next machine finds them (--records DIR), and back
    runner   running one step (train.py / eval.py, or in this process), the state file, the sequential and
             --jobs N schedulers
    results  the eval reports of the finished steps read into the results dict the page is written from
    page     the markdown page, its JSON and figures

It runs from a checkout: the commands are train.py and eval.py in the repository root, and the arms come from
configs/study_fashion_mnist.py (the root on sys.path, as scripts/study.py puts it).
"""
