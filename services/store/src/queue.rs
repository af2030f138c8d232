//! Durable queues (outboxes): named, ordered, at-least-once.
