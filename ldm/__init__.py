"""The LDM model library: networks and diffusion math in pure torch.

Nothing here reads files, talks to other processes or logs; jobs/ and pipeline/
do that around it (see tests/test_ldm_imports.py for the allow-list).
"""
