"""The chatq stack on one machine: the start/stop/status/logs commands, the supervisor,
the embedded servers, the users command and the web build."""
