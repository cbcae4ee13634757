from clipscope_cli.main import main

main()
