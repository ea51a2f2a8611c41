"""Everything that talks to Genesys Cloud: auth, REST client, request budget, retry policy, scope, resync, the notification stream."""
