from tftpd.cli import main

raise SystemExit(main())
