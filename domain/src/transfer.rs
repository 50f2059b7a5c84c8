//! The `Transfer` aggregate: money moving between two accounts of one tenant.
//!
//! No single aggregate can move money between two accounts atomically, so a transfer is a
//! process: requested, then the source is debited (or declines, and the transfer is
//! rejected), then the destination is credited and the transfer completes (or the destination
//! declines, the source is refunded, and the transfer fails). The accounts decide and record
//! each step; this aggregate records the outcomes, in order, and tells the process manager
//! what to do next. Recording a step it has already passed is accepted and changes nothing, so
//! the process manager can repeat itself freely.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::account::{StepOutcome, TransferDecline, TransferStep};
use crate::money::{Amount, Currency, Reference};

/// What was asked: fixed when the transfer is requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TransferTerms {
    pub tenant: String,
    /// The source account.
    pub from: Uuid,
    /// The destination account.
    pub to: Uuid,
    pub amount: Amount,
    pub currency: Currency,
    pub reference: Reference,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferCommand {
    Request(TransferTerms),
    /// The source account's answer to the debit.
    RecordDebit {
        tenant: String,
        outcome: StepOutcome,
    },
    /// The destination account's answer to the credit.
    RecordCredit {
        tenant: String,
        outcome: StepOutcome,
    },
    /// The source account took its money back.
    RecordRefund {
        tenant: String,
    },
}

impl TransferCommand {
    pub fn tenant(&self) -> &str {
        match self {
            Self::Request(terms) => &terms.tenant,
            Self::RecordDebit { tenant, .. }
            | Self::RecordCredit { tenant, .. }
            | Self::RecordRefund { tenant } => tenant,
        }
    }

    /// A stable name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Request(_) => "request_transfer",
            Self::RecordDebit { .. } => "record_debit",
            Self::RecordCredit { .. } => "record_credit",
            Self::RecordRefund { .. } => "record_refund",
        }
    }
}

/// What happened to a transfer. The doc comments are the descriptions analysts read in the
/// event contracts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TransferEvent {
    /// A client asked to move money; nothing has moved yet.
    TransferRequested(TransferTerms),
    /// The source account paid the amount (its `TransferDebited`).
    SourceDebited,
    /// Final: the source account declined the debit; nothing moved.
    TransferRejected { reason: TransferDecline },
    /// The destination account received the amount (its `TransferCredited`).
    DestinationCredited,
    /// Final: the money moved.
    TransferCompleted,
    /// The destination account declined the credit; the source is being refunded.
    CreditDeclined { reason: TransferDecline },
    /// The source account got the amount back (its `TransferRefunded`).
    SourceRefunded,
    /// Final: the destination declined and the source was refunded; nothing moved.
    TransferFailed { reason: TransferDecline },
}

impl DomainEvent for TransferEvent {
    fn event_type(&self) -> String {
        match self {
            Self::TransferRequested(_) => "TransferRequested",
            Self::SourceDebited => "SourceDebited",
            Self::TransferRejected { .. } => "TransferRejected",
            Self::DestinationCredited => "DestinationCredited",
            Self::TransferCompleted => "TransferCompleted",
            Self::CreditDeclined { .. } => "CreditDeclined",
            Self::SourceRefunded => "SourceRefunded",
            Self::TransferFailed { .. } => "TransferFailed",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        Self::current_version(&self.event_type()).to_owned()
    }
}

impl TransferEvent {
    /// The version new events of `event_type` are written as. Raise it with every change of
    /// an event's data, and add an upcaster from the previous version in [`crate::versions`].
    pub fn current_version(_event_type: &str) -> &'static str {
        "1"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("transfer not found")]
    NotFound,
    #[error("a transfer needs two different accounts")]
    SameAccount,
    #[error("transfer already requested")]
    AlreadyRequested,
    /// A step's outcome contradicts one already recorded, or comes before its turn. The
    /// accounts record each outcome once, so this means a bug, never a race.
    #[error("cannot record the {step:?} step ({outcome:?}) of a transfer that is {status:?}")]
    OutOfOrder {
        step: TransferStep,
        outcome: StepOutcome,
        status: TransferStatus,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStatus {
    /// Waiting for the source's debit.
    Requested,
    /// Waiting for the destination's credit.
    Debited,
    Completed,
    /// The source declined: nothing moved.
    Rejected,
    /// The destination declined: waiting for the source's refund.
    Refunding,
    /// Refunded: nothing moved in the end.
    Failed,
}

impl TransferStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Debited => "debited",
            Self::Completed => "completed",
            Self::Rejected => "rejected",
            Self::Refunding => "refunding",
            Self::Failed => "failed",
        }
    }

    /// No step follows.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Rejected | Self::Failed)
    }
}

/// A requested transfer's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedTransfer {
    pub terms: TransferTerms,
    pub status: TransferStatus,
    /// Why it was rejected or failed.
    pub reason: Option<TransferDecline>,
}

/// What the process manager should do next for a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Ask `account` for `step`, then record the outcome here.
    Ask {
        account: Uuid,
        step: TransferStep,
    },
    Done,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    requested: Option<RequestedTransfer>,
}

impl Transfer {
    pub fn state(&self) -> Option<&RequestedTransfer> {
        self.requested.as_ref()
    }

    pub fn belongs_to(&self, tenant: &str) -> bool {
        self.requested
            .as_ref()
            .is_some_and(|transfer| transfer.terms.tenant == tenant)
    }

    /// The step the process is waiting for.
    pub fn next_step(&self) -> NextStep {
        let Some(transfer) = &self.requested else {
            return NextStep::Done;
        };
        let terms = &transfer.terms;
        match transfer.status {
            TransferStatus::Requested => NextStep::Ask {
                account: terms.from,
                step: TransferStep::Debit,
            },
            TransferStatus::Debited => NextStep::Ask {
                account: terms.to,
                step: TransferStep::Credit,
            },
            TransferStatus::Refunding => NextStep::Ask {
                account: terms.from,
                step: TransferStep::Refund,
            },
            TransferStatus::Completed | TransferStatus::Rejected | TransferStatus::Failed => {
                NextStep::Done
            }
        }
    }

    /// Decides which events a command produces (none for a step already recorded).
    pub fn decide(&self, command: TransferCommand) -> Result<Vec<TransferEvent>, TransferError> {
        use StepOutcome::{Applied, Declined};
        use TransferStatus as S;
        let Some(transfer) = &self.requested else {
            return match command {
                TransferCommand::Request(terms) if terms.from == terms.to => {
                    Err(TransferError::SameAccount)
                }
                TransferCommand::Request(terms) => {
                    Ok(vec![TransferEvent::TransferRequested(terms)])
                }
                _ => Err(TransferError::NotFound),
            };
        };
        if transfer.terms.tenant != command.tenant() {
            return Err(TransferError::NotFound);
        }
        let out_of_order = |step, outcome| TransferError::OutOfOrder {
            step,
            outcome,
            status: transfer.status,
        };
        match (command, transfer.status) {
            (TransferCommand::RecordDebit { outcome, .. }, status) => match (outcome, status) {
                (Applied, S::Requested) => Ok(vec![TransferEvent::SourceDebited]),
                (Declined(reason), S::Requested) => {
                    Ok(vec![TransferEvent::TransferRejected { reason }])
                }
                (Applied, S::Debited | S::Completed | S::Refunding | S::Failed)
                | (Declined(_), S::Rejected) => Ok(vec![]),
                (outcome, _) => Err(out_of_order(TransferStep::Debit, outcome)),
            },
            (TransferCommand::RecordCredit { outcome, .. }, status) => match (outcome, status) {
                (Applied, S::Debited) => Ok(vec![
                    TransferEvent::DestinationCredited,
                    TransferEvent::TransferCompleted,
                ]),
                (Declined(reason), S::Debited) => {
                    Ok(vec![TransferEvent::CreditDeclined { reason }])
                }
                (Applied, S::Completed) | (Declined(_), S::Refunding | S::Failed) => Ok(vec![]),
                (outcome, _) => Err(out_of_order(TransferStep::Credit, outcome)),
            },
            (TransferCommand::RecordRefund { .. }, S::Refunding) => {
                let reason = transfer.reason.unwrap_or(TransferDecline::Closed);
                Ok(vec![
                    TransferEvent::SourceRefunded,
                    TransferEvent::TransferFailed { reason },
                ])
            }
            (TransferCommand::RecordRefund { .. }, S::Failed) => Ok(vec![]),
            (TransferCommand::RecordRefund { .. }, _) => {
                Err(out_of_order(TransferStep::Refund, Applied))
            }
            (TransferCommand::Request(_), _) => Err(TransferError::AlreadyRequested),
        }
    }
}

impl Aggregate for Transfer {
    const TYPE: &'static str = "transfer";
    type Command = TransferCommand;
    type Event = TransferEvent;
    type Error = TransferError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        if let TransferEvent::TransferRequested(terms) = event {
            self.requested = Some(RequestedTransfer {
                terms,
                status: TransferStatus::Requested,
                reason: None,
            });
            return;
        }
        let Some(transfer) = self.requested.as_mut() else {
            return;
        };
        match event {
            TransferEvent::TransferRequested(_) => {}
            TransferEvent::SourceDebited => transfer.status = TransferStatus::Debited,
            TransferEvent::TransferRejected { reason } => {
                transfer.status = TransferStatus::Rejected;
                transfer.reason = Some(reason);
            }
            TransferEvent::DestinationCredited => {}
            TransferEvent::TransferCompleted => transfer.status = TransferStatus::Completed,
            TransferEvent::CreditDeclined { reason } => {
                transfer.status = TransferStatus::Refunding;
                transfer.reason = Some(reason);
            }
            TransferEvent::SourceRefunded => {}
            TransferEvent::TransferFailed { .. } => transfer.status = TransferStatus::Failed,
        }
    }
}

#[cfg(test)]
mod tests;
