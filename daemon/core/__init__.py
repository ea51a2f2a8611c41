"""Sans-I/O core: ids, model, events, state, rules, enforcement policy, engine. Imports no asyncio, httpx, websockets or aiohttp."""
