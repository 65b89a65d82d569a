"""tftpd-storm: boot storms against any TFTP server (simulated PXE, MFS and probe clients).

The command is tftpd.storm.cli; bench/ drives the same engine against servers it starts
itself. Modules: workload (the JSON format), content (the bytes of a workload's files),
pyengine and cgen (the two engines of one client state machine), engine (run_storm: the
engine chosen, C when it builds), result (StormResult, Faults), report (tables).
"""
