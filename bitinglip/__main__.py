from bitinglip.cli import main

raise SystemExit(main())
