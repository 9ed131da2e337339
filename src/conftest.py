"""The names the docstring examples assume, for ``python -m pytest --doctest-modules src/maxup``.

Every example starts from fresh objects, seeded, on one thread, in a temporary working directory
(examples that write ``runs/...`` write there): ``torch``, ``nn``, ``F`` (``torch.nn.functional``),
``np``, ``maxup``; ``model`` (a small :class:`maxup.models.SmallCNN`: 3x32x32 images, 10 classes,
first hidden layer ``blocks.0``), ``opt`` (SGD over it), ``loss_fn`` (``F.cross_entropy``); a batch
``x`` (8, 3, 32, 32), ``y`` (8,) and 16 more, ``x_test``, ``y_test``; ``dataset`` (a ``TensorDataset``
of ``x, y``) and ``splits`` (:func:`maxup.data.from_tensors` of the four).

This file lives in ``src/``, outside the ``maxup`` package, so it is never installed.
"""
import importlib.util

import numpy as np
import pytest
import torch

collect_ignore = ["conftest.py", "maxup/train/optim.py"]  # no examples here (tests/conftest.py); a deprecated alias
if importlib.util.find_spec("lightning") is None:  # an optional extra: its integration cannot be imported
    collect_ignore.append("maxup/integrations/lightning.py")


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace, tmp_path, monkeypatch):
    import maxup
    import maxup.data
    import maxup.models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    x_test, y_test = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model = maxup.models.SmallCNN(in_channels=3, num_classes=10, channels=(4, 8, 16))
    doctest_namespace.update(
        torch=torch, nn=torch.nn, F=torch.nn.functional, np=np, maxup=maxup,
        model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=torch.nn.functional.cross_entropy,
        x=x, y=y, x_test=x_test, y_test=y_test,
        dataset=torch.utils.data.TensorDataset(x, y),
        splits=maxup.data.from_tensors(x, y, x_test, y_test, num_classes=10),
    )
    yield
    torch.set_num_threads(threads)
