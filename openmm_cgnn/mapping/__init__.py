"""Learned CG mapping: the mapping file and its application (spec), the auto-encoder that learns it."""

from .spec import (  # noqa: F401
    Bead,
    CGFrames,
    CGMapping,
    Mapping,
    MappingError,
    ResidueMapping,
    apply_mapping,
    cg_frames_from_cg_run,
    load_cg_frames,
    make_molecules_whole,
)
from .learn import learn_mapping  # noqa: F401,E402  (the CGAE: learns a CGMapping from AA frames)
