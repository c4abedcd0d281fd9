from tunnelctl.cli import main

main()
