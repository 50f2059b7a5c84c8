-- Each step of a transfer (debit, credit, refund) happens at most once on an account. The
-- account's state used to remember every step it ever took, so it grew with every transfer and
-- made each load, clone and snapshot of a busy account cost its whole history. The command
-- engine now looks up the steps of the transfers at hand through this index (a few rows,
-- whatever the stream's length), and the index makes a second record of a step impossible,
-- whatever a writer does. Creating it reads the table once, at this migration.
CREATE UNIQUE INDEX events_transfer_step ON events (
    aggregate_id,
    (payload -> event_type ->> 'transfer_id'),
    (CASE
        WHEN event_type IN ('TransferDebited', 'TransferDebitDeclined') THEN 'debit'
        WHEN event_type IN ('TransferCredited', 'TransferCreditDeclined') THEN 'credit'
        ELSE 'refund'
    END)
) WHERE aggregate_type = 'account'
    AND event_type IN ('TransferDebited', 'TransferDebitDeclined', 'TransferCredited',
                       'TransferCreditDeclined', 'TransferRefunded');
