from qbroker.cli import main

raise SystemExit(main())
