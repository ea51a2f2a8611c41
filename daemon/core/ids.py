"""Identifier types. Genesys ids are opaque strings (UUIDs in practice); NewType keeps them apart."""

from typing import NewType

ConversationId = NewType("ConversationId", str)
ParticipantId = NewType("ParticipantId", str)
UserId = NewType("UserId", str)
QueueId = NewType("QueueId", str)
ChannelId = NewType("ChannelId", str)
RuleName = NewType("RuleName", str)
Topic = NewType("Topic", str)
