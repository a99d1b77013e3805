"""Operations: the local cluster launcher, the WAN emulator and the ``txr`` command line.

Owns processes, ports, state directories and the wiring of every other package.
May import every txrouter package; no product package (consistency, regionstore, router) may
import it.
"""
