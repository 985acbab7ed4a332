from cnnctl.cli import main

raise SystemExit(main())
