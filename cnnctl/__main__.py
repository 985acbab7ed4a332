from cnnctl.clients.cli import main

raise SystemExit(main())
