from flashlm.cli import main

raise SystemExit(main())
