from optvq_cli.cli import main

main()
