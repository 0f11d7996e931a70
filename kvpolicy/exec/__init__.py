"""Running a plan on tensors: the pipeline (:mod:`.pipeline`) and its
pure-torch reference stages (:mod:`.reference`); the Triton stages live in
``kvpolicy.kernels`` and are chosen by device."""
