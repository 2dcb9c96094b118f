"""Where bytes live: local disks, fsspec filesystems and object stores, behind one interface; atomic commits."""
