//! Reading a PAT listing page by page ([`PatClient::list_page`]), for
//! callers whose memory must not grow with an organization's PAT count
//! (the orphan sweep, the reconciler).
//!
//! [`PatClient::list`] keeps every authorizationId it read to de-duplicate
//! and to stop a listing that loops; a streamed listing keeps only the ids
//! of the page before and a hash per continuation token (at most
//! `max_pages` of them), so it can hand the same PAT out twice when
//! upstream repeats it on pages further apart. Its callers judge each PAT
//! afresh from the store and count a repeated revoke's not-found as done,
//! so a repeat costs a request and changes nothing.

use std::collections::HashSet;
use std::hash::{Hash as _, Hasher as _};

use super::{ListPats, PatClient, PatToken, UpstreamError};
use crate::domain::{AuthorizationId, Organization};

/// Where a listing read with [`PatClient::list_page`] stands: the
/// continuation token of the next page and what its loop guards need. It
/// stops, like [`PatClient::list`], on an empty page that still has a
/// token, a page without PATs new to it (here: not on the page before), or
/// a repeated token, and then reports the listing incomplete.
#[derive(Debug, Default)]
pub struct ListCursor {
    /// Token of the next page; None before the first.
    next: Option<String>,
    /// Pages read so far.
    pages: u32,
    /// Ids on the last page read.
    previous: HashSet<AuthorizationId>,
    /// Hashes of the tokens followed (a collision only stops early, which
    /// is reported as incomplete, the safe side).
    tokens: HashSet<u64>,
    /// Some(complete) once the listing ended.
    end: Option<bool>,
}

impl ListCursor {
    /// A cursor before the first page.
    pub fn new() -> Self {
        ListCursor::default()
    }

    /// None while pages remain; Some(true) once the last page was read
    /// (it carried no continuation token); Some(false) once paging stopped
    /// early, so a PAT not read may still exist upstream.
    pub fn ended(&self) -> Option<bool> {
        self.end
    }

    /// Pages read so far.
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// The continuation token to send for the next page (None: the first).
    pub fn token(&self) -> Option<&str> {
        self.next.as_deref()
    }

    /// Takes in the page just read (`pats` as upstream sent them, then its
    /// `continuationToken`): returns the PATs to hand out, each id once and
    /// none from the page before, and, if paging stops early here, why.
    pub fn accept(
        &mut self,
        pats: Vec<PatToken>,
        continuation: Option<String>,
    ) -> (Vec<PatToken>, Option<&'static str>) {
        self.pages += 1;
        let on_page = pats.len();
        let mut ids = HashSet::with_capacity(on_page);
        let fresh: Vec<PatToken> = pats
            .into_iter()
            .filter(|p| {
                ids.insert(p.authorization_id) && !self.previous.contains(&p.authorization_id)
            })
            .collect();
        self.previous = ids;
        self.next = None;
        let Some(next) = continuation.filter(|t| !t.trim().is_empty()) else {
            self.end = Some(true);
            return (fresh, None);
        };
        let stop = if on_page == 0 {
            Some("empty page with a continuation token")
        } else if fresh.is_empty() {
            Some("page held no new PATs")
        } else if !self.tokens.insert(token_hash(&next)) {
            Some("continuation token repeated")
        } else {
            None
        };
        match stop {
            Some(_) => self.end = Some(false),
            None => self.next = Some(next),
        }
        (fresh, stop)
    }
}

fn token_hash(token: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    token.hash(&mut hasher);
    hasher.finish()
}

/// An organization's PATs, page by page, for a caller that revokes what it
/// reads: each page is handed out only once the page after it has been
/// fetched. Upstream's continuation token may point at the last PAT of the
/// page before (the emulator's does); revoking that PAT before the next
/// page is fetched could end an `active` listing there, seemingly
/// complete. At most two pages are held.
pub struct PatPages<'a> {
    client: &'a dyn PatClient,
    organization: &'a Organization,
    query: ListPats,
    cursor: ListCursor,
    /// The page fetched but not yet handed out.
    ahead: Option<Vec<PatToken>>,
    /// An error met fetching the page after `ahead`, returned once `ahead`
    /// has been handed out.
    failed: Option<UpstreamError>,
}

impl<'a> PatPages<'a> {
    /// The listing of `organization` with `query`; nothing is fetched yet.
    pub fn new(client: &'a dyn PatClient, organization: &'a Organization, query: ListPats) -> Self {
        PatPages {
            client,
            organization,
            query,
            cursor: ListCursor::new(),
            ahead: None,
            failed: None,
        }
    }

    /// The next page: Ok(None) once the listing ended ([`Self::complete`]
    /// then says whether every page was read). Pages are never empty. An
    /// upstream error is returned after the pages read before it were
    /// handed out, and ends the listing.
    pub async fn next_page(&mut self) -> Result<Option<Vec<PatToken>>, UpstreamError> {
        loop {
            if let Some(e) = self.failed.take() {
                return Err(e);
            }
            if self.cursor.ended().is_some() {
                return Ok(self.ahead.take());
            }
            match self
                .client
                .list_page(self.organization, &self.query, &mut self.cursor)
                .await
            {
                // A page with nothing new to hand out (a last page that
                // only repeated the page before) is skipped.
                Ok(page) if page.is_empty() => {}
                Ok(page) => {
                    if let Some(before) = self.ahead.replace(page) {
                        return Ok(Some(before));
                    }
                }
                Err(e) => {
                    // End here: no later page is read after an error.
                    self.cursor.end = Some(false);
                    match self.ahead.take() {
                        Some(before) => {
                            self.failed = Some(e);
                            return Ok(Some(before));
                        }
                        None => return Err(e),
                    }
                }
            }
        }
    }

    /// True once the listing ended with its last page read; false while
    /// pages remain, or when it stopped early or failed.
    pub fn complete(&self) -> bool {
        self.cursor.ended() == Some(true) && self.ahead.is_none() && self.failed.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn pat(id: u128) -> PatToken {
        PatToken {
            authorization_id: AuthorizationId::from_uuid(uuid::Uuid::from_u128(id)),
            display_name: format!("pat {id}"),
            scope: "vso.code".into(),
            target_accounts: None,
            token: None,
            valid_from: Utc::now(),
            valid_to: Utc::now(),
        }
    }

    /// Ids handed out and the stop reason after a page of `ids` with `token`.
    fn accept(
        cursor: &mut ListCursor,
        token: &str,
        ids: &[u128],
    ) -> (Vec<u128>, Option<&'static str>) {
        let (pats, stop) = cursor.accept(ids.iter().map(|&i| pat(i)).collect(), Some(token.into()));
        let ids = pats
            .iter()
            .map(|p| p.authorization_id.as_uuid().as_u128())
            .collect();
        (ids, stop)
    }

    #[test]
    fn pages_are_followed_until_the_empty_token() {
        let mut cursor = ListCursor::new();
        assert_eq!(accept(&mut cursor, "a", &[1, 2]), (vec![1, 2], None));
        assert_eq!(cursor.token(), Some("a"));
        assert_eq!(accept(&mut cursor, "b", &[3, 4]), (vec![3, 4], None));
        assert_eq!(cursor.ended(), None);
        assert_eq!(accept(&mut cursor, " ", &[5]), (vec![5], None));
        assert_eq!(cursor.ended(), Some(true));
        assert_eq!(cursor.pages(), 3);
        let mut cursor = ListCursor::new();
        let (last, stop) = cursor.accept(vec![pat(1)], None);
        assert_eq!((last.len(), stop), (1, None));
        assert_eq!(cursor.ended(), Some(true));
    }

    #[test]
    fn loops_stop_the_listing_as_incomplete() {
        let mut cursor = ListCursor::new();
        accept(&mut cursor, "a", &[1, 2]);
        assert!(accept(&mut cursor, "a", &[3]).1.is_some(), "repeated token");
        assert_eq!(cursor.ended(), Some(false));

        let mut cursor = ListCursor::new();
        accept(&mut cursor, "a", &[1, 2]);
        assert_eq!(
            accept(&mut cursor, "b", &[2, 1, 1]),
            (vec![], Some("page held no new PATs"))
        );
        assert_eq!(cursor.ended(), Some(false));

        let mut cursor = ListCursor::new();
        assert_eq!(
            accept(&mut cursor, "a", &[]),
            (vec![], Some("empty page with a continuation token"))
        );
        assert_eq!(cursor.ended(), Some(false));
    }

    #[test]
    fn only_the_page_before_is_remembered() {
        let mut cursor = ListCursor::new();
        accept(&mut cursor, "a", &[1, 2]);
        assert_eq!(accept(&mut cursor, "b", &[2, 3, 3]), (vec![3], None));
        // 1 was two pages back: handed out again (callers judge it afresh).
        assert_eq!(accept(&mut cursor, "c", &[1, 3, 4]), (vec![1, 4], None));
        assert_eq!(cursor.previous.len(), 3);
    }
}
