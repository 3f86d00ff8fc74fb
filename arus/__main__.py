from arus.cli import main

raise SystemExit(main())
