"""Training programs written for Lightning Fabric, run by tests/test_programs.py under Lightning and under fabric_ckpt.

Each program is one script; the only difference between the two runs is which ``Fabric`` it imports, chosen by the
``PROGRAM_FABRIC`` environment variable (``lightning`` or ``fabric_ckpt``). ``common`` holds the test plumbing the
programs share (their command line and where they write what they did); the training code is each program's own.
"""
