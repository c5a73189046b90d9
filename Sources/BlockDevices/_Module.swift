// BlockDevices — see shared/DESIGN.md §1. (Module placeholder until its first real file lands.)
