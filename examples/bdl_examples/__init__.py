"""The small harness every example program and benchmark imports (``pip install -e examples``).

- ``models``: the networks (``MLP``, ``LeNet``, ``ResNet18``, ``SmallCNN``), defined once.
- ``data``: digits, generated tasks, IDX and CIFAR files, splits and minibatches.
- ``training``: the fit loop (one jitted scan per epoch) with a sampling hook.
- ``methods``: the compared methods of the uncertainty suite (MAP, IVON, implicit VI).
- ``paper``: runs of the implicit-VI paper's program (data, network, generator, optimizer),
  rebuilt from their saved flags; ``paper_config``: the paper's generator files.
- ``metrics``: accuracy, NLL, Brier, ECE, reliability bins, OOD AUROC.
- ``checkpoints``: atomic files and ``.npz`` checkpoints checked against a template.
- ``progress``: a one-line progress bar.
- ``cli``: flags given on the command line, resuming a run with its saved arguments, ranges.
- ``plots``: matplotlib without a display, PNG files, reliability diagrams.
- ``language``: bytes: a generated language with a known next-byte distribution, text files,
  evaluation windows, and the decoder-only ``Transformer`` (Flax NNX).
"""
