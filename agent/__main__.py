from agent.cli.agent_main import main

raise SystemExit(main())
