"""python3 -m tftpd.storm: the tftpd-storm command."""

from tftpd.storm.cli import main

raise SystemExit(main())
