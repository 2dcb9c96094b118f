"""The core: state dicts <-> live objects, filters, validated all-or-nothing restore, staging. No I/O here."""
