"""Local stand-ins for the services Phasecast drives, for the demo and for users' own tests."""
