use cqrs_es::Aggregate;
use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::*;

type TransferTest = TestFramework<Transfer>;

const TENANT: &str = "acme";
const FROM: Uuid = Uuid::from_u128(1);
const TO: Uuid = Uuid::from_u128(2);

fn terms() -> TransferTerms {
    TransferTerms {
        tenant: TENANT.into(),
        from: FROM,
        to: TO,
        amount: Amount::parse(250).unwrap(),
        currency: Currency::parse("EUR").unwrap(),
        reference: Reference::parse("rent").unwrap(),
    }
}

const DECLINE: TransferDecline = TransferDecline::Frozen;

fn debit(outcome: StepOutcome) -> TransferCommand {
    TransferCommand::RecordDebit {
        tenant: TENANT.into(),
        outcome,
    }
}

fn credit(outcome: StepOutcome) -> TransferCommand {
    TransferCommand::RecordCredit {
        tenant: TENANT.into(),
        outcome,
    }
}

fn refund() -> TransferCommand {
    TransferCommand::RecordRefund {
        tenant: TENANT.into(),
    }
}

/// The events that bring a transfer to each status.
fn history(status: TransferStatus) -> Vec<TransferEvent> {
    use TransferEvent as E;
    let requested = E::TransferRequested(terms());
    match status {
        TransferStatus::Requested => vec![requested],
        TransferStatus::Debited => vec![requested, E::SourceDebited],
        TransferStatus::Completed => vec![
            requested,
            E::SourceDebited,
            E::DestinationCredited,
            E::TransferCompleted,
        ],
        TransferStatus::Rejected => vec![requested, E::TransferRejected { reason: DECLINE }],
        TransferStatus::Refunding => vec![
            requested,
            E::SourceDebited,
            E::CreditDeclined { reason: DECLINE },
        ],
        TransferStatus::Failed => vec![
            requested,
            E::SourceDebited,
            E::CreditDeclined { reason: DECLINE },
            E::SourceRefunded,
            E::TransferFailed { reason: DECLINE },
        ],
    }
}

const STATUSES: [TransferStatus; 6] = [
    TransferStatus::Requested,
    TransferStatus::Debited,
    TransferStatus::Completed,
    TransferStatus::Rejected,
    TransferStatus::Refunding,
    TransferStatus::Failed,
];

#[test]
fn a_request_between_two_accounts_is_recorded() {
    TransferTest::with(())
        .given_no_previous_events()
        .when(TransferCommand::Request(terms()))
        .then_expect_events(vec![TransferEvent::TransferRequested(terms())]);
    let mut to_self = terms();
    to_self.to = FROM;
    TransferTest::with(())
        .given_no_previous_events()
        .when(TransferCommand::Request(to_self))
        .then_expect_error(TransferError::SameAccount);
}

#[test]
fn every_command_in_every_state() {
    use StepOutcome::{Applied, Declined};
    use TransferEvent as E;
    use TransferStatus as S;
    let out_of_order = |step, outcome, status| {
        Err(TransferError::OutOfOrder {
            step,
            outcome,
            status,
        })
    };
    for status in STATUSES {
        let cases: Vec<(TransferCommand, Result<Vec<TransferEvent>, TransferError>)> = vec![
            (
                TransferCommand::Request(terms()),
                Err(TransferError::AlreadyRequested),
            ),
            (
                debit(Applied),
                match status {
                    S::Requested => Ok(vec![E::SourceDebited]),
                    S::Rejected => out_of_order(TransferStep::Debit, Applied, status),
                    _ => Ok(vec![]),
                },
            ),
            (
                debit(Declined(DECLINE)),
                match status {
                    S::Requested => Ok(vec![E::TransferRejected { reason: DECLINE }]),
                    S::Rejected => Ok(vec![]),
                    _ => out_of_order(TransferStep::Debit, Declined(DECLINE), status),
                },
            ),
            (
                credit(Applied),
                match status {
                    S::Debited => Ok(vec![E::DestinationCredited, E::TransferCompleted]),
                    S::Completed => Ok(vec![]),
                    _ => out_of_order(TransferStep::Credit, Applied, status),
                },
            ),
            (
                credit(Declined(DECLINE)),
                match status {
                    S::Debited => Ok(vec![E::CreditDeclined { reason: DECLINE }]),
                    S::Refunding | S::Failed => Ok(vec![]),
                    _ => out_of_order(TransferStep::Credit, Declined(DECLINE), status),
                },
            ),
            (
                refund(),
                match status {
                    S::Refunding => Ok(vec![
                        E::SourceRefunded,
                        E::TransferFailed { reason: DECLINE },
                    ]),
                    S::Failed => Ok(vec![]),
                    _ => out_of_order(TransferStep::Refund, Applied, status),
                },
            ),
        ];
        for (command, expected) in cases {
            let test = TransferTest::with(()).given(history(status)).when(command);
            match expected {
                Ok(events) => test.then_expect_events(events),
                Err(err) => test.then_expect_error(err),
            }
        }
    }
}

#[test]
fn another_tenant_or_no_transfer_is_not_found() {
    for status in STATUSES {
        TransferTest::with(())
            .given(history(status))
            .when(TransferCommand::RecordRefund {
                tenant: "globex".into(),
            })
            .then_expect_error(TransferError::NotFound);
    }
    TransferTest::with(())
        .given_no_previous_events()
        .when(refund())
        .then_expect_error(TransferError::NotFound);
}

#[test]
fn each_status_names_the_next_step() {
    let expected = [
        (TransferStatus::Requested, FROM, Some(TransferStep::Debit)),
        (TransferStatus::Debited, TO, Some(TransferStep::Credit)),
        (TransferStatus::Refunding, FROM, Some(TransferStep::Refund)),
        (TransferStatus::Completed, FROM, None),
        (TransferStatus::Rejected, FROM, None),
        (TransferStatus::Failed, FROM, None),
    ];
    for (status, account, step) in expected {
        let mut transfer = Transfer::default();
        for event in history(status) {
            transfer.apply(event);
        }
        assert_eq!(transfer.state().unwrap().status, status);
        assert_eq!(status.is_final(), step.is_none());
        let next = step.map_or(NextStep::Done, |step| NextStep::Ask { account, step });
        assert_eq!(transfer.next_step(), next);
    }
}

#[test]
fn events_name_their_type_and_version() {
    for status in STATUSES {
        for event in history(status) {
            assert_eq!(event.event_version(), "1");
            let json = serde_json::to_value(&event).unwrap();
            let tagged = match &json {
                serde_json::Value::String(name) => name.clone(),
                serde_json::Value::Object(fields) => fields.keys().next().unwrap().clone(),
                other => panic!("{other}"),
            };
            assert_eq!(tagged, event.event_type());
        }
    }
}
