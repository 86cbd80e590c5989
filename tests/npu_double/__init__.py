"""A test double of torch_npu for the npu backend's contract tests (tests only, never the runtime).

tests/lowering/test_npu_contract.py loads `torch_npu.py` from its file and monkeypatches it in as
``sys.modules["torch_npu"]`` for each test, so the backend's own ``import torch_npu`` gets it.
It implements, in plain torch on any device, the documented semantics and argument constraints
of every op the backend calls, and raises `ContractError` where the real op would refuse its
arguments (`NotImplementedError` for features the double does not model).
"""
