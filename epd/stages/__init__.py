"""The ``epd`` commands, one module each: its flags (``add_arguments``) beside its handler (``run``). A command
only turns its config and flags into a call of the library (``epd.teacher``, ``epd.distill``, …) and logs what it
did; the work itself lives in the library."""
